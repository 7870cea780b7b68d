from fastlatent.cli import main

raise SystemExit(main())
