from voicejury_runtime.threads import prefer_passive_waits

prefer_passive_waits()  # before the app imports the model's libraries

from .app import build  # noqa: E402

build().run()
