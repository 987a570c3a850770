from pgbridge.cli import main

raise SystemExit(main())
