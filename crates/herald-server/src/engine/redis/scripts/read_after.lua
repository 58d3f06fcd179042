-- Reads a stream's bounds and the entries after an offset, in one snapshot.
--
-- KEYS: 1 the stream's meta hash, 2 the stream
-- ARGV: 1 the offset to read after, 2 the most entries (0: bounds only)
-- Returns {epoch (empty when unset), newest offset, oldest stored offset (0: none), entries}.
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = 0
if oldest[1] then
  first = tonumber(string.match(oldest[1][1], '^(%d+)'))
end
local entries = {}
local limit = tonumber(ARGV[2])
if limit > 0 then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT', limit)
end
return {epoch, last, first, entries}
