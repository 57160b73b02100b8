import sys

from forgeline.cli import main

sys.exit(main())
