import sys

from llmprune.cli import main

sys.exit(main())
