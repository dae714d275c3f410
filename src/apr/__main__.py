from apr.entry import run

run()
