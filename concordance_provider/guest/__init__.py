"""Code that runs inside a component built for the messaging-handler world, not in the daemon.

``build.py`` copies these modules into the component beside the author's module; they are never
imported by the daemon itself.
"""
