from conftest import Running, open_client


async def test_subscribe_and_receive(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        assert await c.call({"op": "subscribe", "channel": "BTCUSDT@depth", "id": 1}) == {
            "result": True,
            "id": 1,
        }
        seq = await running.publish("depth_BTCUSDT", {"bids": [], "asks": []})
        assert await c.recv() == {
            "event": "BTCUSDT@depth",
            "data": {"bids": [], "asks": []},
            "seq": seq,
        }
