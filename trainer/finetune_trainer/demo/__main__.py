import sys

from finetune_trainer.demo import main

sys.exit(main())
