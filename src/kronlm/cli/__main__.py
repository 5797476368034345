import sys

from kronlm.cli import main

sys.exit(main())
