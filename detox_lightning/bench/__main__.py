from detox_lightning.bench.driver import main

main()
