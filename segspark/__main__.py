import sys

from segspark.cli import main

sys.exit(main())
