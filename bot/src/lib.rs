//! CodeTogether's Discord front end (`ct-bot`). Modules arrive in the following commits.
