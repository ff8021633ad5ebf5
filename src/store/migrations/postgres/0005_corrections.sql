-- Version 5: corrections and chat ratings.
--
-- A vote may carry the user's correction ("the right answer would have been…"), delivered to
-- MLflow as an `expected_response` expectation through its own outbox row (key: the message,
-- the user and the name `expected_response`). The text is kept on the vote that carries it,
-- so that a retraction knows there is a correction to delete and GET /api/feedback can show it.
ALTER TABLE votes ADD COLUMN IF NOT EXISTS expected_response text;

-- A chat rating waits for, then lands on, the first trace of the user's chat: its links are
-- read by chat and user, oldest first.
CREATE INDEX IF NOT EXISTS message_links_chat_user ON message_links (chat_id, user_id, created_at);
