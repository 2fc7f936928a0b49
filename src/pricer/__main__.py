import sys

from pricer.cli import main

sys.exit(main())
