from party_sync.cli import main

raise SystemExit(main())
