from leco.cli import main

raise SystemExit(main())
