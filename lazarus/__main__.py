from lazarus.cli import main

raise SystemExit(main())
