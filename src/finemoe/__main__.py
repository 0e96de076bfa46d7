from finemoe.cli import main

raise SystemExit(main())
