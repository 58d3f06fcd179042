-- Claims a direct message's request for its sender, before any inbox is written: the first
-- attempt records the message id and timestamp it chose, and every attempt within the
-- record's lifetime (on any node) goes on with those, so the per-recipient appends, keyed by
-- the message id, store each copy once and complete what an earlier attempt left undone.
--
-- KEYS: 1 the request's retry record under the sender's hash tag (a string: "ts id")
-- ARGV: 1 this attempt's message id, 2 its ts, 3 the record's lifetime in milliseconds
-- Returns the record: the first attempt's (this one's when the request is new).
local first = redis.call('GET', KEYS[1])
if first then
  return first
end
local claim = ARGV[2] .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], claim, 'PX', ARGV[3])
return claim
