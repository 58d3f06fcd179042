-- Appends one message to a room's stream and publishes its frame, in one step: the offset is
-- taken, the message stored and the frame published atomically, so frames of one room leave
-- Redis in offset order whichever node appended them.
--
-- KEYS: 1 the stream's meta hash (epoch, last), 2 the stream, 3 the room's pub/sub channel
-- ARGV: 1 an epoch for a new stream, 2 PUBLISH or SPUBLISH, 3 the envelope awaiting its
--       offset, 4 id, 5 from, 6 ts, 7 binary (0/1), 8 content
-- Returns {offset, epoch}.
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local offset = redis.call('HINCRBY', KEYS[1], 'last', 1)
redis.call('XADD', KEYS[2], offset .. '-0',
  'i', ARGV[4], 'f', ARGV[5], 't', ARGV[6], 'b', ARGV[7], 'c', ARGV[8])
redis.call(ARGV[2], KEYS[3], ARGV[3] .. offset)
return {offset, redis.call('HGET', KEYS[1], 'epoch')}
