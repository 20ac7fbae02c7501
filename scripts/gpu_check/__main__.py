import sys

from gpu_check.cli import main

sys.exit(main())
