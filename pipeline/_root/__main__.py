from sokhan.pipeline.cli import main

raise SystemExit(main())
