from moorage.cli.entry import main

main()
