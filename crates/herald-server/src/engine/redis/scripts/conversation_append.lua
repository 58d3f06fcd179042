-- Appends a direct message to the conversation of its sender with one recipient, once per
-- message id: a retry returns the offset the first attempt got.
--
-- KEYS: 1 the conversation's meta hash (epoch, last), 2 the stream, 3 the ids seen (zset
--       id -> offset)
-- ARGV: 1 an epoch for a new conversation, 2 ids remembered, 3 their lifetime in seconds,
--       4 id, 5 from, 6 recipients (JSON), 7 ts, 8 binary (0/1), 9 content
-- Returns the offset.
local seen = redis.call('ZSCORE', KEYS[3], ARGV[4])
if seen then
  return tonumber(seen)
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local offset = redis.call('HINCRBY', KEYS[1], 'last', 1)
redis.call('XADD', KEYS[2], offset .. '-0',
  'i', ARGV[4], 'f', ARGV[5], 'o', ARGV[6], 't', ARGV[7], 'b', ARGV[8], 'c', ARGV[9])
redis.call('ZADD', KEYS[3], offset, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (offset - tonumber(ARGV[2]) + 1))
redis.call('EXPIRE', KEYS[3], ARGV[3])
return offset
