import sys

from lcprobe.cli.main import main

sys.exit(main())
