from cifar_transfer.cli import main

raise SystemExit(main())
