from pushd.cli import main

raise SystemExit(main())
