import sys

from keras_newton.cli import main

sys.exit(main())
