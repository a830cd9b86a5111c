import sys

from ntk_server.cli import main

sys.exit(main())
