"""What the balancer knows of each connection: the records (client connection, backend
connection, request) and the vocabulary their close causes are said in. Pure data; every layer
above writes facts, observe/ publishes them."""
