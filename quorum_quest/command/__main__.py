import sys

from quorum_quest.command import main

sys.exit(main())
