"""The baseline courier must beat: a typical hand-written Python worker (aio-pika + aiohttp).

Consumes QUEUE with a prefetch, POSTs each event's data with the same contract headers, acks after
the POST, and exits after N messages. Run by courier-bench; by hand:
    python3 tools/courier-bench/python_baseline.py AMQP_URL QUEUE TARGET_URL PREFETCH N
"""
import asyncio
import json
import sys

import aio_pika
import aiohttp


async def main(url: str, queue: str, target: str, prefetch: int, n: int) -> None:
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    q = await channel.declare_queue(queue, durable=True)
    done = 0
    finished = asyncio.Event()
    async with aiohttp.ClientSession() as http:

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal done
            event = json.loads(message.body)
            data = event.get("data", event)
            headers = {
                "Content-Type": "application/json",
                "X-Request-Id": str(event["id"]),
                "X-Correlation-Id": str(event["id"]),
            }
            async with http.post(target, data=json.dumps(data), headers=headers) as response:
                await response.read()
            await message.ack()
            done += 1
            if done >= n:
                finished.set()

        await q.consume(handle)
        await finished.wait()
    await connection.close()


if __name__ == "__main__":
    amqp_url, queue_name, target_url, prefetch_count, count = sys.argv[1:6]
    asyncio.run(main(amqp_url, queue_name, target_url, int(prefetch_count), int(count)))
