#!/bin/sh
# Create the logs index pattern in OpenSearch Dashboards with a fixed id, and make it the default.
#
# The id is the pattern itself (mlops-logs-*): the generated dashboards' "Logs of this rank/node" links
# open Discover with _a=(index:'<id>'), so a random id (what the UI makes) would leave them dangling.
# Waits for Dashboards to answer (it starts after OpenSearch, slowly), then overwrites the saved object,
# so running it again is harmless. Needs only POSIX sh and curl (the curlimages/curl image).
#
# Saved objects live per tenant when the Security plugin's multi-tenancy is on (the image's default,
# with each user's private tenant preferred): the pattern and the default go to every tenant in
# TENANTS, sent as the securitytenant header (docs.opensearch.org, "Saved Objects APIs", "Selecting a
# tenant"): the global tenant every user shares and the setup user's private one (__user__). Without
# multi-tenancy the header is ignored and the second write overwrites the first with the same object.
set -eu
: "${OSD_URL:=http://opensearch-dashboards:5601}"
: "${OSD_USERNAME:=admin}"
: "${OSD_PASSWORD:?OSD_PASSWORD is required}"
: "${INDEX_PATTERN:=mlops-logs-*}"
: "${TIME_FIELD:=@timestamp}"
: "${WAIT_SECONDS:=600}"
: "${TENANTS:=global __user__}"

auth="$OSD_USERNAME:$OSD_PASSWORD"
id_path=$(printf '%s' "$INDEX_PATTERN" | sed 's/\*/%2A/g')

waited=0
until curl -fsS -o /dev/null -u "$auth" "$OSD_URL/api/status"; do
  if [ "$waited" -ge "$WAIT_SECONDS" ]; then
    echo "index-pattern: OpenSearch Dashboards at $OSD_URL did not answer within ${WAIT_SECONDS}s" >&2
    exit 1
  fi
  sleep 5
  waited=$((waited + 5))
done

for tenant in $TENANTS; do
  curl -fsS -u "$auth" -X POST "$OSD_URL/api/saved_objects/index-pattern/$id_path?overwrite=true" \
    -H 'osd-xsrf: true' -H "securitytenant: $tenant" -H 'Content-Type: application/json' \
    -d "{\"attributes\":{\"title\":\"$INDEX_PATTERN\",\"timeFieldName\":\"$TIME_FIELD\"}}"
  echo
  curl -fsS -u "$auth" -X POST "$OSD_URL/api/opensearch-dashboards/settings" \
    -H 'osd-xsrf: true' -H "securitytenant: $tenant" -H 'Content-Type: application/json' \
    -d "{\"changes\":{\"defaultIndex\":\"$INDEX_PATTERN\"}}"
  echo
done
echo "index-pattern: $INDEX_PATTERN (id $INDEX_PATTERN, time field $TIME_FIELD) is the default in tenants: $TENANTS"
