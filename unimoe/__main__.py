import sys

from unimoe.cli import main

sys.exit(main())
