from kowalski.agent.main import main

raise SystemExit(main())
