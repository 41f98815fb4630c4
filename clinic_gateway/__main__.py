from clinic_gateway.cli import main

raise SystemExit(main())
