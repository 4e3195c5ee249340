from enrich._cli import main

raise SystemExit(main())
