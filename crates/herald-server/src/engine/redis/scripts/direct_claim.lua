-- Claims a direct message's request for its sender, before any inbox is written: the first
-- attempt records the message id and timestamp it chose, and every attempt within the
-- record's lifetime (on any node) goes on with those, so the per-recipient appends, keyed by
-- the message id, store each copy once and complete what an earlier attempt left undone.
--
-- KEYS: 1 the request's retry record under the sender's hash tag (hash: i id, t ts)
-- ARGV: 1 this attempt's message id, 2 its ts, 3 the record's lifetime in milliseconds
-- Returns {id, ts} of the first attempt (this one's when the request is new).
local first = redis.call('HMGET', KEYS[1], 'i', 't')
if first[1] then
  return first
end
redis.call('HSET', KEYS[1], 'i', ARGV[1], 't', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {ARGV[1], ARGV[2]}
