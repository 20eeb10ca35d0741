from gitopsd.cli import main

raise SystemExit(main())
