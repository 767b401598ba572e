"""The one hardened HTTP server the exporter and the alert sink serve through.

* :mod:`~mlops_obs.web.server`: asyncio + h11; routes in, bytes out; deadlines, a connection
  budget that sheds idle connections, body limits, bounded bcrypt checks, ``--web.max-requests``.
* :mod:`~mlops_obs.web.config`: the exporter-toolkit ``--web.config.file`` (TLS, mTLS, basic
  auth, headers), the refusal of reloads that would weaken a port, the reload-status series.
* :mod:`~mlops_obs.web.headers`: pure parsers for ``Accept-Encoding`` and ``Authorization``.
"""
