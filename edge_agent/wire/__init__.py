"""The two wire protocols: score requests (test program <-> agent, ``score``) and drift windows
(agent -> collector, ``stats``); their documents sit beside them."""
