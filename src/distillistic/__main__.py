import sys

from distillistic.cli import main

sys.exit(main())
