from ddp_mnist.commands.cli import main

raise SystemExit(main())
