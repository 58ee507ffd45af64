"""The sweep command as a script, `python jobs/submit.py SPEC|status|wait|cancel|resubmit ...`
(the same as `cifar-dist sweep ...`); its code is the package's, cifar_dist/sweep/."""

import sys

from cifar_dist.sweep.commands import main

if __name__ == "__main__":
    sys.exit(main())
