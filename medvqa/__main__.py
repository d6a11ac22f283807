from medvqa.cli import main

raise SystemExit(main())
