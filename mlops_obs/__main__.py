from mlops_obs.cli import main

raise SystemExit(main())
