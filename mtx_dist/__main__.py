import sys

from mtx_dist.cli import main

sys.exit(main())
