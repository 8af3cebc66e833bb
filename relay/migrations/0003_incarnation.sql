-- A random token naming the server's run since its last crash (see "Crashes" in relay/src/store/postgres/).
-- Unlogged, so crash recovery empties it and the first connection after that writes a new token; a clean
-- restart keeps it. A node that sees the token change knows that writes it had not flushed may be lost.
CREATE UNLOGGED TABLE ct_incarnation (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    token text NOT NULL
);
