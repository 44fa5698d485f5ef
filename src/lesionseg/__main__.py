import sys

from lesionseg.cli import main

sys.exit(main())
