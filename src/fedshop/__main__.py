from fedshop.cli import main

main()
