import os
import sys

# make tests/_dist.py importable as `_dist` and the package importable without installing
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
