from kowalski.controller.cli import main

raise SystemExit(main())
