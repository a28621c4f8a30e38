from kowalski.controller.cli.main import main

raise SystemExit(main())
