from dschat_cli.cli.app import main

main()
